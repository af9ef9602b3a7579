//! A server's memory, read from `/proc` (the server runs on this machine): its resident set
//! when idle, and how far one large upload raises its peak. A server that streams blobs holds
//! a few chunks of an upload at a time whatever the blob's size; one that buffers a blob
//! whole grows by its size.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi::Digest;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::blobs::{fill, write_resource, BlobFactory};
use super::client::Clients;

/// Bytes of one WriteRequest of the upload.
const CHUNK_BYTES: usize = 1 << 20;

/// What [`measure`] found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Resident set of the idle server, bytes.
    pub idle_rss_bytes: u64,
    /// Size of the blob uploaded, bytes.
    pub upload_bytes: u64,
    /// The server's resident set as the upload starts, bytes.
    pub rss_before_bytes: u64,
    /// Its peak resident set during the upload, bytes: `VmHWM`, reset as the upload starts
    /// (through `/proc/PID/clear_refs`; if that is refused, the highest `VmRSS` sampled every
    /// 10 ms instead).
    pub peak_rss_during_bytes: u64,
    /// Whether the kernel's peak could be reset (else the figure is sampled).
    pub peak_reset: bool,
    /// How far the upload raised the resident set at its peak, bytes.
    pub upload_peak_growth_bytes: u64,
    /// Seconds the upload took (its bytes made and sent as it went).
    pub upload_secs: f64,
}

/// `VmRSS` and `VmHWM` of process `pid`, bytes.
pub fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(Path::new(&path)).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text.lines().find(|l| l.starts_with(name)).with_context(|| format!("{path} has no {name}"))?;
        let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().with_context(|| format!("{path}: {line:?}"))?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The contents of the large blob: chunk `i` of the stream seeded with `seed`.
fn chunk(seed: u64, i: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15), &mut b);
    // The seed and index up front: unique by construction, as the suite's blobs.
    let tag: Vec<u8> = seed.to_le_bytes().into_iter().chain(i.to_le_bytes()).collect();
    let n = tag.len().min(len);
    b[..n].copy_from_slice(&tag[..n]);
    b
}

/// Measures server process `pid`: its idle resident set (after `settle`), then one upload of
/// `bytes` through `clients`, made and sent chunk by chunk (the client holds a few chunks,
/// not the blob), and the peak resident set it caused.
pub async fn measure(clients: &Clients, pid: u32, bytes: u64, settle: Duration) -> anyhow::Result<MemoryReport> {
    tokio::time::sleep(settle).await;
    let (idle, _) = rss(pid)?;
    let seed = BlobFactory::clock_nonce();
    let chunks = bytes.div_ceil(CHUNK_BYTES as u64);
    let len_of = move |i: u64| (bytes - i * CHUNK_BYTES as u64).min(CHUNK_BYTES as u64) as usize;
    // The digest first: a pass that makes and hashes the chunks, untimed.
    let hash = tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        for i in 0..chunks {
            h.update(chunk(seed, i, len_of(i)));
        }
        hex::encode(h.finalize())
    })
    .await?;
    let d = Digest { hash, size_bytes: bytes as i64 };
    let resource = write_resource(&clients.instance, &BlobFactory::new(seed).upload_id(), &d);
    let requests = futures::stream::iter((0..chunks).map(move |i| WriteRequest {
        resource_name: if i == 0 { resource.clone() } else { String::new() },
        write_offset: (i * CHUNK_BYTES as u64) as i64,
        finish_write: i + 1 == chunks,
        data: chunk(seed, i, len_of(i)),
    }));
    // "5" resets the peak resident set to the current one (proc(5), clear_refs).
    let peak_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let (before, _) = rss(pid)?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut high = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((now, _)) = rss(pid) {
                    high = high.max(now);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            high
        })
    };
    let started = Instant::now();
    let written = clients.bytestream().write(requests).await;
    let upload_secs = started.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let sampled = sampler.await.unwrap_or(0);
    let committed = written.context("the large upload")?.into_inner().committed_size;
    anyhow::ensure!(committed == bytes as i64, "the large upload committed {committed} of {bytes} bytes");
    let (after, hwm) = rss(pid)?;
    let peak = if peak_reset { hwm.max(sampled) } else { sampled.max(after) };
    Ok(MemoryReport {
        idle_rss_bytes: idle,
        upload_bytes: bytes,
        rss_before_bytes: before,
        peak_rss_during_bytes: peak,
        peak_reset,
        upload_peak_growth_bytes: peak.saturating_sub(before),
        upload_secs,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_a_resident_set_and_a_peak_at_least_as_large() {
        let (rss, peak) = super::rss(std::process::id()).unwrap();
        assert!(rss > 0 && peak >= rss, "rss {rss}, peak {peak}");
    }
}
