//! A filter that knows which blobs this node certainly does not hold.
//!
//! Half the digests of a typical FindMissingBlobs are missing, and each used to cost an index
//! read to learn it. This is a Bloom filter over the index keys: every key is added before its
//! index entry is written, so "not in the filter" means "not indexed". Removals are not
//! reflected (a Bloom filter cannot forget), which only makes it answer "maybe" more often: a
//! "maybe" falls through to the index. Its size is fixed, so it is bounded; past a few million
//! blobs its "maybe"s grow common and it simply saves less.
//!
//! Keys are hashes the clients choose, so the bit positions come from the key bytes: a client
//! picking colliding hashes can only make its own checks read the index, as without a filter.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::digest::HASH_LEN;

/// 2^24 bits (2 MiB): about 0.5 % false "maybe" at a million blobs, with three probes.
const BITS_LOG2: u32 = 24;
const PROBES: usize = 3;

pub struct AbsentFilter {
    words: Vec<AtomicU64>,
}

impl Default for AbsentFilter {
    fn default() -> Self {
        Self { words: (0..(1usize << BITS_LOG2) / 64).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl AbsentFilter {
    fn positions(key: &[u8; 1 + HASH_LEN]) -> [usize; PROBES] {
        let mut out = [0usize; PROBES];
        for (i, p) in out.iter_mut().enumerate() {
            let start = 1 + i * 8;
            let word = u64::from_le_bytes(key[start..start + 8].try_into().expect("8 bytes"));
            // Mix in the digest function byte so SHA-256 and BLAKE3 keys of equal hash differ.
            *p = ((word ^ u64::from(key[0]).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> (64 - BITS_LOG2)) as usize;
        }
        out
    }

    /// Records `key` as possibly present. Call before the key's index entry is written.
    pub fn insert(&self, key: &[u8; 1 + HASH_LEN]) {
        for p in Self::positions(key) {
            self.words[p / 64].fetch_or(1 << (p % 64), Ordering::Release);
        }
    }

    /// True if `key` was never inserted: the blob is certainly not indexed.
    pub fn certainly_absent(&self, key: &[u8; 1 + HASH_LEN]) -> bool {
        Self::positions(key).iter().any(|&p| self.words[p / 64].load(Ordering::Acquire) & (1 << (p % 64)) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_keys_are_never_absent_and_most_others_are() {
        let f = AbsentFilter::default();
        let key = |i: u64| {
            let mut k = [0u8; 1 + HASH_LEN];
            k[0] = 1;
            k[1..].copy_from_slice(&crate::digest::DigestFunction::Sha256.digest_of(&i.to_le_bytes()).hash);
            k
        };
        for i in 0..100_000 {
            f.insert(&key(i));
        }
        assert!((0..100_000).all(|i| !f.certainly_absent(&key(i))));
        let absent = (100_000..110_000).filter(|&i| f.certainly_absent(&key(i))).count();
        assert!(absent > 9_900, "only {absent} of 10,000 unknown keys were known absent");
    }
}
