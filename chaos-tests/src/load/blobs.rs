//! Unique blob contents, their digests, and ByteStream resource names.
//!
//! Every blob the load generator sends is new to the server — in this run and in any earlier
//! run against the same server — so that no write is short-circuited by "already present" and
//! no read is served from a client-side cache. Contents come from a xorshift64* generator
//! seeded with a per-run nonce and a per-blob counter: about 1–2 GB/s on one core, so even a
//! 64 MiB blob costs tens of milliseconds to make. (Rejected: a counter pattern, which is as
//! fast but compresses to nothing and would flatter a server that compresses at rest.)
//!
//! Hashing happens here, while a workload prepares its operations and before its clock starts:
//! a benchmark of the server must not be a benchmark of the client's SHA-256.

use std::sync::atomic::{AtomicU64, Ordering};

use kiln_proto::reapi::Digest;
use sha2::{Digest as _, Sha256};

/// Makes unique blobs and ids for one run.
#[derive(Debug)]
pub struct BlobFactory {
    nonce: u64,
    counter: AtomicU64,
}

/// A xorshift64* generator: fast, not cryptographic, reproducible from its seed. Never zero.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that neighbouring seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (n > 0); the modulo bias is irrelevant for picking test keys.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Fills `buf` with the pseudo-random stream of `seed`.
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut rng = XorShift::new(seed);
    let mut words = buf.chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = words.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    rest.copy_from_slice(&last[..rest.len()]);
}

/// The SHA-256 digest of `data`.
pub fn digest_of(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

impl BlobFactory {
    /// A factory whose blobs differ from those of any other factory with another nonce.
    pub fn new(nonce: u64) -> Self {
        Self {
            nonce,
            counter: AtomicU64::new(0),
        }
    }

    /// A nonce from the clock and the process id: distinct across runs on one machine.
    pub fn clock_nonce() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ (u64::from(std::process::id()) << 40)
    }

    fn seed_of(&self, n: u64) -> u64 {
        XorShift::new(self.nonce ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
    }

    fn next_seed(&self) -> u64 {
        self.seed_of(self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// A new blob of `size` bytes and its digest. The first 16 bytes are the nonce and the
    /// counter, which makes uniqueness a matter of construction rather than of probability.
    pub fn blob(&self, size: usize) -> (Digest, Vec<u8>) {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut data = vec![0u8; size];
        fill(self.seed_of(n), &mut data);
        let header: Vec<u8> = self
            .nonce
            .to_le_bytes()
            .into_iter()
            .chain(n.to_le_bytes())
            .collect();
        let h = header.len().min(size);
        data[..h].copy_from_slice(&header[..h]);
        (digest_of(&data), data)
    }

    /// A digest of `size` bytes that no blob has: for the "missing" half of FindMissingBlobs.
    pub fn absent_digest(&self, size: i64) -> Digest {
        let mut hash = [0u8; 32];
        fill(self.next_seed(), &mut hash);
        Digest {
            hash: hex::encode(hash),
            size_bytes: size,
        }
    }

    /// A fresh UUID-shaped upload id (version-4 layout), for ByteStream write resource names.
    pub fn upload_id(&self) -> String {
        let mut b = [0u8; 16];
        fill(self.next_seed(), &mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let h = hex::encode(b);
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// `{instance}/blobs/{hash}/{size}` with the instance segment left out when empty.
pub fn read_resource(instance: &str, d: &Digest) -> String {
    with_instance(instance, format!("blobs/{}/{}", d.hash, d.size_bytes))
}

/// `{instance}/uploads/{uuid}/blobs/{hash}/{size}`.
pub fn write_resource(instance: &str, upload_id: &str, d: &Digest) -> String {
    with_instance(
        instance,
        format!("uploads/{upload_id}/blobs/{}/{}", d.hash, d.size_bytes),
    )
}

fn with_instance(instance: &str, rest: String) -> String {
    if instance.is_empty() {
        rest
    } else {
        format!("{instance}/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_unique_and_digests_match() {
        let f = BlobFactory::new(42);
        let (d1, b1) = f.blob(1000);
        let (d2, b2) = f.blob(1000);
        assert_ne!(b1, b2);
        assert_ne!(d1.hash, d2.hash);
        assert_eq!(d1, digest_of(&b1));
        assert_eq!(d1.size_bytes, 1000);
        // Another run (nonce) makes other blobs from the same counter.
        let (d3, _) = BlobFactory::new(43).blob(1000);
        assert_ne!(d1.hash, d3.hash);
        // Odd and tiny sizes work.
        assert_eq!(f.blob(3).1.len(), 3);
        assert_eq!(f.blob(0).0.size_bytes, 0);
    }

    #[test]
    fn resource_names_follow_reapi() {
        let d = Digest {
            hash: "ab".into(),
            size_bytes: 5,
        };
        assert_eq!(read_resource("", &d), "blobs/ab/5");
        assert_eq!(read_resource("main", &d), "main/blobs/ab/5");
        assert_eq!(write_resource("", "u", &d), "uploads/u/blobs/ab/5");
        let id = BlobFactory::new(1).upload_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
